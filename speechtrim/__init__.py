"""speechtrim: cut the audio tokens a speech LLM processes, without losing what it hears."""

__version__ = "0.1.0"
