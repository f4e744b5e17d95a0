"""Learned image codecs (compressai modules) and the .evc container."""
