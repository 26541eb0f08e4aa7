"""`latentloom serve`: the local web page, an AUTOMATIC1111-compatible API and the job queue behind them."""
