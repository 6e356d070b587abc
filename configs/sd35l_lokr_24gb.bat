@echo off
rem SD3.5 Large LoKr on a 24 GB GPU: the frozen 8 B-parameter MMDiT in float8 (--fp8_base, about 8 GB
rem instead of 16), gradient checkpointing, text encoders cached and unloaded, batch 1 x 4 accumulated.
rem LoKr with full Kronecker factors (factor 8), as Kohaku XL trained its LyCORIS models: about 0.13 B
rem trainable parameters, no rank to tune (alpha is unused with full factors).
rem Memory is an estimate (about 13-16 GB at 1024 px), not measured here.
rem
rem set MODELS=..., OUT=... and DATASET=... first (or edit the defaults below), then run configs\sd35l_lokr_24gb.bat
rem
rem Training shift 3 is SD3.5 Large's own; for anime at 1024 px the SD3.5-M card found 5-7 better.
setlocal
cd /d "%~dp0.."
if not defined MODELS set "MODELS=models"
if not defined OUT set "OUT=outputs\lokr"
if not defined DATASET set "DATASET=configs\datasets\anime_1024.toml"

accelerate launch --num_cpu_threads_per_process 2 sd3_train_network.py ^
  --pretrained_model_name_or_path "%MODELS%\sd3.5_large.safetensors" ^
  --clip_l "%MODELS%\clip_l.safetensors" --clip_g "%MODELS%\clip_g.safetensors" ^
  --t5xxl "%MODELS%\t5xxl_fp16.safetensors" ^
  --dataset_config "%DATASET%" ^
  --output_dir "%OUT%\sd35l_lokr" --output_name sd35l_lokr ^
  --network_module networks.lokr_sd3 --network_dim 100000 --network_alpha 1 ^
  --network_args "factor=8" "full_matrix=True" --network_train_unet_only ^
  --fp8_base --sdpa --gradient_checkpointing --mixed_precision bf16 --save_precision bf16 --seed 42 ^
  --cache_latents --cache_latents_to_disk --vae_batch_size 2 ^
  --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk ^
  --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_epochs 8 ^
  --optimizer_type AdamW8bit --learning_rate 1e-4 --lr_scheduler cosine --lr_warmup_steps 0.05 ^
  --weighting_scheme logit_normal --training_shift 3 ^
  --save_every_n_epochs 2 ^
  --sample_prompts configs\sample_prompts.txt --sample_every_n_epochs 2
if errorlevel 1 exit /b 1
