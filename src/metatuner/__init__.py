"""metatuner: prompt and parameter co-optimization for LLMs (MetaTuner, ICLR 2026) with fair baselines."""

__version__ = "0.1.0"
