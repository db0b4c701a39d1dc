"""The files of a checkpoint folder, in timm's layout: named once, read by io, the Hub fetch and the run folder."""

CONFIG_NAME = "config.json"  # architecture, num_classes, pretrained_cfg and the plan (in model_args)
WEIGHTS_NAME = "model.safetensors"
PLAN_METADATA_KEY = "flexsurgeon_plan"  # the plan again, as JSON in the safetensors metadata
