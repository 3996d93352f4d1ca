"""Counting inputs skipped while reading data (corrupt, short, unreadable): by reason, with a few examples."""

from __future__ import annotations

import collections
import logging
from typing import Dict, List


class SkipCounter:
  """Counts skipped inputs by reason, keeping a few example names per reason for the report."""

  def __init__(self):
    self.counts: Dict[str, int] = collections.Counter()
    self.examples: Dict[str, List[str]] = collections.defaultdict(list)

  def add(self, reason: str, name: str, detail: str = "") -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < 3:
      self.examples[reason].append(f"{name}{': ' + detail if detail else ''}")
    logging.info("skipping %s: %s %s", name, reason, detail)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def as_dict(self) -> Dict[str, int]:
    return dict(sorted(self.counts.items()))

  def report(self) -> str:
    if not self.counts:
      return "no inputs skipped"
    lines = [f"skipped {self.total} input(s):"]
    for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
      lines.append(f"  {reason}: {n} (e.g. {'; '.join(self.examples[reason])})")
    return "\n".join(lines)
