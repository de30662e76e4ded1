"""`adapt serve`: an OpenAI-compatible HTTP server over a diffusion checkpoint (docs/generation.md, "Serving").

`api` reads a request into a `Job`, `batcher` decodes jobs whose options agree as one batch on a worker
thread, `text` turns decoded ids into an answer's text (as a whole, or the prefix committed so far while
streaming) and `app` is the FastAPI application that ties them together.
"""
