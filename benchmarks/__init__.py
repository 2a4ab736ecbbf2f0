"""Real-model benchmark suite for hf_compress: offline model zoo, data, metrics, runner and plots."""
