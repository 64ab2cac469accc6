"""`nbdev_export`, with each module's `__all__` kept within 120 characters.

nbdev 2.4.14 wraps the list of exported names at 120 characters and only then puts `__all__ = ` in front of it, so the
first line can reach 130. This runs `nbdev_export` (same arguments) with the first line narrowed by that prefix."""

import textwrap

import nbdev.maker
from nbdev.doclinks import nbdev_export

PREFIX = "__all__ = "


class AllWrapper(textwrap.TextWrapper):
    "nbdev's wrapper for `__all__`, leaving room on the first line for the prefix nbdev adds afterwards."

    def wrap(self, text):
        indented = textwrap.TextWrapper(
            width=self.width,
            initial_indent=" " * len(PREFIX),
            subsequent_indent=self.subsequent_indent,
            break_long_words=False,
        ).wrap(text)
        return [indented[0][len(PREFIX) :], *indented[1:]] if indented else indented


nbdev.maker.TextWrapper = AllWrapper
if __name__ == "__main__":
    nbdev_export()
