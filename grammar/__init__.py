"""The lark grammar of the `.rec` language (`rec.lark`, beside this file)."""

from pathlib import Path

GRAMMAR_PATH = Path(__file__).with_name("rec.lark")


def grammar_text() -> str:
    """The grammar source, as lark reads it."""
    return GRAMMAR_PATH.read_text()
