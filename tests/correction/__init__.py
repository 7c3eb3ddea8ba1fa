"""Tests of spray.correction."""
