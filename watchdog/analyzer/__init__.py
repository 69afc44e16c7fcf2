"""The pure analyzer: ``diagnose(Snapshot, AnalyzerConfig) -> Diagnosis``. No I/O in this package."""

from watchdog.analyzer.config import AnalyzerConfig
from watchdog.analyzer.context import Rule
from watchdog.analyzer.diagnose import diagnose
from watchdog.analyzer.rules import RULES

__all__ = ["RULES", "AnalyzerConfig", "Rule", "diagnose"]
