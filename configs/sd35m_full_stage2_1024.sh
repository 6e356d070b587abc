#!/usr/bin/env bash
# SD3.5 Medium anime full fine-tune, stage 2 of 2: 1024 px (details on the 512 px foundation).
# After the SD3.5-M anime model card (its runs v007A/v008A): AdamW 8-bit, the "mode" density (learns
# the whole image, backgrounds included), training shift 7 (5-7 balanced at 1024 px; 3 broke anatomy),
# batch 2 x 2 accumulated, CLIP-L/G trained further.
# Starts from stage 1's final file, which holds the MMDiT, the VAE and the trained CLIP-L/G (so no
# --clip_l/--clip_g here); T5 was never trained and comes from the original file.
#
#   MODELS=/path/to/models OUT=/path/to/outputs bash configs/sd35m_full_stage2_1024.sh
#
# Sample the result with shift ~7, CFG ~6, Euler a, Simple/Beta, 20-40 steps (the card's advice).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS="${MODELS:-models}"
OUT="${OUT:-outputs/anime}"

accelerate launch --num_cpu_threads_per_process 2 sd3_train.py \
  --pretrained_model_name_or_path "$OUT/stage1_512/anime_stage1_512.safetensors" \
  --t5xxl "$MODELS/t5xxl_fp16.safetensors" \
  --dataset_config configs/datasets/anime_1024.toml \
  --output_dir "$OUT/stage2_1024" --output_name anime_stage2_1024 \
  --sdpa --gradient_checkpointing --mixed_precision bf16 --save_precision bf16 --seed 1 \
  --cache_latents --cache_latents_to_disk --vae_batch_size 4 --cache_info \
  --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk --use_t5xxl_cache_only \
  --max_data_loader_n_workers 1 --disable_mmap_load_safetensors \
  --train_batch_size 2 --gradient_accumulation_steps 2 --max_train_epochs 2 \
  --optimizer_type AdamW8bit \
  --learning_rate 5e-5 --learning_rate_te1 1e-5 --learning_rate_te2 2e-5 \
  --lr_scheduler cosine --lr_warmup_steps 100 \
  --weighting_scheme mode --training_shift 7 \
  --train_text_encoder --save_clip \
  --save_every_n_steps 2000 --save_last_n_steps 6000 --save_state \
  --sample_prompts configs/sample_prompts_anime.txt --sample_every_n_steps 2000
