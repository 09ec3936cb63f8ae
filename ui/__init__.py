"""The Gradio side of app.py: the event handlers (`ui.handlers.GroundedSamApp`) and ZeroGPU
support (`ui.zero_gpu`). The libraries, `grounding/` and `segmentation/`, never import Gradio."""
