"""Process groups, meshes and the collectives autoep builds on."""
