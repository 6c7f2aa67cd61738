"""The cascade workload and the audio, codec, latent-data and synthesis code only it uses."""
