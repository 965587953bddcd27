"""HTTP front end: the OpenAI and Ollama APIs and the CLI. Imports engine's public API, never models."""
