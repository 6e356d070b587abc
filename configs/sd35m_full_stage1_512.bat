@echo off
rem SD3.5 Medium anime full fine-tune, stage 1 of 2: 512 px (composition, poses: low frequencies first).
rem After the SD3.5-M anime model card (its run v12A): Cautious ADOPT, logit-normal sigmas, training
rem shift 2.5 (the card's best at 512 px), batch 4, CLIP-L/G trained and saved in the checkpoint.
rem Then run configs\sd35m_full_stage2_1024.bat, which starts from this stage's final file.
rem
rem set MODELS=... and OUT=... first (or edit the defaults below), then run configs\sd35m_full_stage1_512.bat
rem
rem MODELS holds sd3.5_medium.safetensors, clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors.
rem Set image_dir in configs/datasets/anime_512.toml first (captions: tools/build_captions.py).
rem Count the steps before you start: python tools/steps.py with the same flags.
rem Offline? add --tokenizer_cache_dir "%MODELS%\tokenizers" (see README, Generating images).
setlocal
cd /d "%~dp0.."
if not defined MODELS set "MODELS=models"
if not defined OUT set "OUT=outputs\anime"

accelerate launch --num_cpu_threads_per_process 2 sd3_train.py ^
  --pretrained_model_name_or_path "%MODELS%\sd3.5_medium.safetensors" ^
  --clip_l "%MODELS%\clip_l.safetensors" --clip_g "%MODELS%\clip_g.safetensors" ^
  --t5xxl "%MODELS%\t5xxl_fp16.safetensors" ^
  --dataset_config configs\datasets\anime_512.toml ^
  --output_dir "%OUT%\stage1_512" --output_name anime_stage1_512 ^
  --sdpa --gradient_checkpointing --mixed_precision bf16 --save_precision bf16 --seed 1 ^
  --cache_latents --cache_latents_to_disk --vae_batch_size 4 --cache_info ^
  --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk --use_t5xxl_cache_only ^
  --max_data_loader_n_workers 1 --disable_mmap_load_safetensors ^
  --train_batch_size 4 --gradient_accumulation_steps 1 --max_train_epochs 5 ^
  --optimizer_type pytorch_optimizer.optimizer.adopt.ADOPT ^
  --optimizer_args "cautious=True" "weight_decay=0.01" "weight_decouple=True" ^
  --learning_rate 5e-5 --learning_rate_te1 5e-6 --learning_rate_te2 1e-5 ^
  --lr_scheduler cosine --lr_warmup_steps 200 ^
  --weighting_scheme logit_normal --training_shift 2.5 ^
  --train_text_encoder --save_clip ^
  --save_every_n_epochs 1 --save_last_n_epochs 2 --save_state ^
  --sample_prompts configs\sample_prompts_anime.txt --sample_every_n_epochs 1
if errorlevel 1 exit /b 1
