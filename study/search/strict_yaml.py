"""YAML for files people write by hand: no aliases, no duplicate keys.

Plain `yaml.safe_load` accepts both, and both turn a small, plausible-looking
file into something other than what it says: nested aliases expand a few
hundred bytes into gigabytes (a "billion laughs"), and a key written twice
silently keeps its last value (`lr` as a range, then `lr: 5`, searches nothing).
"""

from __future__ import annotations

import yaml


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that a hand-written file must not contain; `problem_mark` says where."""


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RefusedYAML(problem=f"alias *{event.anchor} refused: write the value out (aliases let a few "
                                      "hundred bytes expand into gigabytes)", problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if seen:
                raise RefusedYAML(problem=f"duplicate key {key!r} (first on line {first_line[key] + 1})",
                                  problem_mark=key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def safe_load(text: str):
    """Like `yaml.safe_load`; raises RefusedYAML for an alias or a key given twice in one mapping."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
