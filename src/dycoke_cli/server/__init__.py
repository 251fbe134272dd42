"""`dycoke serve`: an OpenAI-compatible HTTP server (chat completions about one video per
conversation).

app.py builds the FastAPI app and runs uvicorn; protocol.py holds the request and response
shapes and the errors in OpenAI's form; conversation.py turns ``messages`` into the prompt;
media.py reads ``file://`` and ``data:`` URLs within the server's limits; sessions.py keeps
recent sessions (the encoded video and its prefix KV) in an LRU; runner.py runs one generation
at a time behind a bounded queue. Only the command line (cli/) imports this package.
"""
