"""The one transcription of the official DINO code that tests and benchmarks share."""
