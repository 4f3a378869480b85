"""Reinforcement learning with verifiable rewards (GRPO) after SFT: the objective (``grpo.py``), one step
(``step.py``) and the verifiable questions (``data.py``); ``CausalLMModule`` runs it when ``model.rl`` is set."""
