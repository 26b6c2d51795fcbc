"""The formats of other tools, in and out (DESIGN.md floor 3): official DINO files, timm and Hugging Face
transformers folders. Each export is checked by loading it back."""
