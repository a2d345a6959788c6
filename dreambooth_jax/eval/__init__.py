"""Subject-fidelity metrics of the DreamBooth paper: CLIP-I/T, DINO, LPIPS-based diversity."""
