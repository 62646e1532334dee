"""The automodel engine: its spec (light, any stage may import it) and its training code."""
