@echo off
rem SD3.5 Medium LoRA on a 16 GB GPU: rank 16 on the MMDiT only, text encoders cached and unloaded,
rem bf16 base with gradient checkpointing (estimate: about 8-10 GB at 1024 px, batch 2; not measured).
rem Tight on memory? add --fp8_base (the frozen MMDiT in float8, about 2.5 GB less).
rem
rem set MODELS=..., OUT=... and DATASET=... first (or edit the defaults below), then run configs\sd35m_lora_16gb.bat
rem
rem The trained file loads in ComfyUI and in sd3_minimal_inference.py --lora_weights "file;1.0".
setlocal
cd /d "%~dp0.."
if not defined MODELS set "MODELS=models"
if not defined OUT set "OUT=outputs\lora"
if not defined DATASET set "DATASET=configs\datasets\anime_1024.toml"

accelerate launch --num_cpu_threads_per_process 2 sd3_train_network.py ^
  --pretrained_model_name_or_path "%MODELS%\sd3.5_medium.safetensors" ^
  --clip_l "%MODELS%\clip_l.safetensors" --clip_g "%MODELS%\clip_g.safetensors" ^
  --t5xxl "%MODELS%\t5xxl_fp16.safetensors" ^
  --dataset_config "%DATASET%" ^
  --output_dir "%OUT%\sd35m_lora" --output_name sd35m_lora ^
  --network_module networks.lora_sd3 --network_dim 16 --network_alpha 16 --network_train_unet_only ^
  --sdpa --gradient_checkpointing --mixed_precision bf16 --save_precision bf16 --seed 42 ^
  --cache_latents --cache_latents_to_disk --vae_batch_size 4 ^
  --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk ^
  --train_batch_size 2 --max_train_epochs 10 ^
  --optimizer_type AdamW8bit --learning_rate 1e-4 --lr_scheduler cosine --lr_warmup_steps 0.05 ^
  --weighting_scheme logit_normal --training_shift 5 ^
  --save_every_n_epochs 2 ^
  --sample_prompts configs\sample_prompts.txt --sample_every_n_epochs 2
if errorlevel 1 exit /b 1
