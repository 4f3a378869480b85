"""Reinforcement learning with verifiable rewards (GRPO) after SFT: its LightningModule (``module.py``), the objective
(``grpo.py``), rollouts and rewards (``rollout.py``, ``sampler.py``), chunked scoring (``scoring.py``), the verifiable
questions (``data.py``) and the pass-rate filter (``passrate.py``). ``configs/rl.yaml`` names ``GRPOModule``."""
