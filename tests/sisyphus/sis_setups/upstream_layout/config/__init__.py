"""Configs of the demo setup."""
