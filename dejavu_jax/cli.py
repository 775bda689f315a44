"""What the command-line tools share: the --help formatter."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without '(default: None)', '(default: False)' or '(default: )' (nothing
    to tell) and without a second default where an option's help already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == ""
        if nothing or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


class DocHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter for a parser whose description is a module docstring laid out by hand."""
