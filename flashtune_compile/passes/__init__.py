"""FX rewrites of the graphs Dynamo captures. Passes know shapes and symbols, never timings."""
