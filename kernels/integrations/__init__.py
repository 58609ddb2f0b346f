"""Our kernels inside other trainers, through the hooks those trainers already have.

- `rarl_kernels.integrations.trl`: TRL 1.15+ (`patch_trl()` for TRL's fused lm-head; `FusedGRPOTrainer` /
  `FusedGRPOLossMixin` for a fused GRPO loss). Imports `trl`.
- `rarl_kernels.integrations.verl`: verl's `linear_cross_entropy` and `FusedLinearForPPO` (`patch_verl()`), and
  `rarl_kernels.integrations.verl_patch`, the module to name in verl's `external_lib` hook. Imports `verl` only to
  patch it.

Importing `rarl_kernels` imports none of these: the core package needs torch and triton only.
"""
