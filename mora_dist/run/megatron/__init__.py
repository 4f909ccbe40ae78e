"""The megatron-core back end of the launcher: the model and its DeepSpeed engine (:mod:`.model`), megatron-native
training without DeepSpeed (:mod:`.native`), Hugging Face weights in and out (:mod:`.hf_weights`) and the export of
a run (:mod:`.export`). Spec: §4.
"""
