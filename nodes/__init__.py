"""Node registration: one table feeds ComfyUI's class and display-name mappings.

Node ids are part of the public workflow format: never rename them.
"""
from .attention_maps import AttentionMapViewer
from .forget_train import ForgetTrain
from .forget_train_simple import ForgetTrainSimple
from .harden import HardenForgetPatch
from .inversion import ConceptInversion
from .mscore import MScore
from .patches import ApplyForgetPatch, LoadForgetPatch, MergeForgetPatches, SaveForgetPatch, register_folder
from .recovery import RecoveryAttack
from .toybench import LoadToyBench

NODES = (
    ("FMN_ForgetTrainSimple", ForgetTrainSimple, "Forget Train"),
    ("FMN_ForgetTrain", ForgetTrain, "Forget Train (Advanced)"),
    ("FMN_ApplyForgetPatch", ApplyForgetPatch, "Apply Forget Patch"),
    ("FMN_LoadForgetPatch", LoadForgetPatch, "Load Forget Patch"),
    ("FMN_SaveForgetPatch", SaveForgetPatch, "Save Forget Patch"),
    ("FMN_MergeForgetPatches", MergeForgetPatches, "Merge Forget Patches"),
    ("FMN_LoadToyBench", LoadToyBench, "Load ToyBench"),
    ("FMN_ConceptInversion", ConceptInversion, "Concept Inversion"),
    ("FMN_MScore", MScore, "M-Score"),
    ("FMN_AttentionMapViewer", AttentionMapViewer, "Attention Map Viewer"),
    ("FMN_RecoveryAttack", RecoveryAttack, "Recovery Attack"),
    ("FMN_HardenForgetPatch", HardenForgetPatch, "Harden Forget Patch"),
)

register_folder()
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, cls, _ in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, _, name in NODES}
