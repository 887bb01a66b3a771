"""Other engines and formats: llama.cpp control vectors (GGUF)."""
