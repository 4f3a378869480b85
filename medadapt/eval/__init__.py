"""Evaluation: lm-eval-exact log-likelihood scoring and result reports."""
