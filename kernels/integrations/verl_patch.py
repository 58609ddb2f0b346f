"""Importing this module makes verl's fused kernels ours (`rarl_kernels.integrations.verl.patch_verl`): name it in
verl's external-library hook, `actor_rollout_ref.model.external_lib=rarl_kernels.integrations.verl_patch`, which
every verl process that builds the model imports (or in `VERL_USE_EXTERNAL_MODULES`, imported by `import verl`)."""

from rarl_kernels.integrations.verl import patch_verl

patch_verl()
