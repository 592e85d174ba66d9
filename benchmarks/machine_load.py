"""What the machine was doing while a benchmark ran: load average and peak host memory.

Every benchmark prints these beside its times: on a shared 2-core machine they decide whether two
numbers can be compared at all.
"""

from __future__ import annotations

import os
import resource


def load() -> str:
  """The 1, 5 and 15 minute load averages, e.g. '1.6/1.8/2.1'."""
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def peak_rss_gib() -> float:
  """This process's peak resident memory so far, in GiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
