"""`hybrimoe serve`: an OpenAI-compatible HTTP server on the hybrid runtime (`server.serve`)."""
