"""Models: loading the teacher and student (diffusers folders or hub ids), the attention processors
(all-layer K/V), the SD 2 tokenizer, and the frozen backbones of the discriminators and the identity
encoder."""
