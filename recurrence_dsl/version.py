"""The package version, in a module of its own that imports nothing.

It sits in the bottom layer of `recurrence_dsl`, so any package (codegen's generated-module header, the
CLI's `--version`) can read it without importing the `recurrence_dsl` facade and, through it, the layers
above."""

__version__ = "0.1.0"
