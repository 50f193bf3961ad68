"""Tests of selection/."""
