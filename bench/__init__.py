"""Benchmarks for capbus: result model, printer and comparison ("peer") mechanisms."""
