"""The T2I API call contract shared by DABench, the agent and the executor (DESIGN.md, "Stages and contracts")."""
from __future__ import annotations

ARCHITECTURES = ("SD 1.5", "SDXL 1.0")
MODEL_TYPES = ("Checkpoint", "LORA")
# A1111 sampler names (as Civitai metadata writes them) the executor maps to diffusers schedulers.
KNOWN_SAMPLERS = ("Euler", "Euler a", "DDIM", "PNDM", "LMS", "LMS Karras", "Heun", "DPM2", "DPM2 a", "DPM2 Karras",
                  "DPM2 a Karras", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ SDE",
                  "DPM++ SDE Karras", "UniPC")
SIZE_RANGE = (256, 2048)  # pixels, each side; sizes must also be multiples of 8
STEPS_RANGE = (1, 150)
CFG_RANGE = (1.0, 30.0)
API_FIELDS = ("model", "type", "base_model", "width", "height", "sampling_method", "sampling_steps", "cfg_scale",
              "model_description")
DEFAULT_PARAMETERS = {"sampling_method": "Euler a", "sampling_steps": 20, "cfg_scale": 7.0}

API_SCHEMA = {
    "type": "object",
    "required": list(API_FIELDS),
    "additionalProperties": False,
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "type": {"enum": list(MODEL_TYPES)},
        "base_model": {"enum": list(ARCHITECTURES)},
        "width": {"type": "integer", "minimum": SIZE_RANGE[0], "maximum": SIZE_RANGE[1], "multipleOf": 8},
        "height": {"type": "integer", "minimum": SIZE_RANGE[0], "maximum": SIZE_RANGE[1], "multipleOf": 8},
        "sampling_method": {"enum": list(KNOWN_SAMPLERS)},
        "sampling_steps": {"type": "integer", "minimum": STEPS_RANGE[0], "maximum": STEPS_RANGE[1]},
        "cfg_scale": {"type": "number", "minimum": CFG_RANGE[0], "maximum": CFG_RANGE[1]},
        "model_description": {"type": "string", "minLength": 1},
    },
}

DABENCH_RECORD_SCHEMA = {
    "type": "object",
    "required": ["id", "image_id", "model_id", "model_version_id", "architecture", "instruction", "api", "lora_base",
                 "seed", "description_provenance", "split"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": r"^\d+-\d+$"},
        "image_id": {"type": "integer"},
        "model_id": {"type": "integer"},
        "model_version_id": {"type": "integer"},
        "architecture": {"enum": list(ARCHITECTURES)},
        "instruction": {"type": "object", "required": ["prompt", "negative_prompt"], "additionalProperties": False,
                        "properties": {"prompt": {"type": "string", "minLength": 1, "not": {"pattern": "<lora:"}},
                                       "negative_prompt": {"type": "string"}}},
        "api": API_SCHEMA,
        "lora_base": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["model_id", "model_version_id", "model"], "additionalProperties": False,
            "properties": {"model_id": {"type": "integer"}, "model_version_id": {"type": "integer"},
                           "model": {"type": "string"}}}]},
        "seed": {"type": ["integer", "null"]},
        "description_provenance": {"type": "object", "required": ["backend", "stand_in", "fallback"],
                                   "properties": {"backend": {"type": "string"}, "stand_in": {"type": "boolean"},
                                                  "fallback": {"type": "boolean"}}},
        "split": {"enum": ["train", "align", "test"]},
    },
}


def schema_errors(record: dict, schema: dict = DABENCH_RECORD_SCHEMA) -> list[str]:
    """Every way `record` breaks `schema`, as readable lines (empty when it validates)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<record>'}: {e.message}" for e in validator.iter_errors(record)]
