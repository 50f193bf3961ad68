"""Tests of attninf/."""
