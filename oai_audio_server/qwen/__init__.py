"""Everything that knows the Qwen-Audio-Chat remote code's public interface."""
