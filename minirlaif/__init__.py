"""minirlaif: a minimal, readable RLAIF pipeline (SFT -> AI labels -> reward model -> PPO -> win rates)."""
