"""cagsr_reward: CAGSR rewards from attention maps (numpy only at import time)."""
__version__ = "0.1.0"
