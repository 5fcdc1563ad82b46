use std::process::ExitCode;

use clap::Parser;
use synthia_bot::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match cli::load_settings(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::CheckConfig = cli.command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let threads = match &cli.command {
        Command::Bench(args) => args.threads.unwrap_or(settings.model.threads as usize),
        _ => settings.model.threads as usize,
    };
    // SAFETY: no other thread exists yet; candle reads these once, on first use.
    unsafe { synthia_bot::inference::set_cpu_threads(threads) };
    synthia_bot::inference::tune_for_inference();
    // The interactive chat's screen holds the conversation alone.
    match &cli.command {
        Command::Chat(args)
            if !args.verbose && std::io::IsTerminal::is_terminal(&std::io::stdin()) =>
        {
            cli::init_logging_aside(&settings, &settings.console.log_file)
        }
        _ => cli::init_logging(&settings),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::CheckConfig => Ok(()),
            Command::Serve => synthia_bot::serve::serve(settings, cli.config.clone()).await,
            Command::Chat(args) => cli::chat(settings, args).await,
            Command::Prompt(args) => cli::prompt(settings, args).await,
            Command::Export(args) => cli::export(settings, args).await,
            Command::Generate(args) => cli::generate(settings, args).await,
            Command::MigrateMemory(args) => cli::migrate_memory(settings, args).await,
            Command::BenchMemory(args) => {
                let report = synthia_bot::bench::memory::run(&args).await?;
                let mut out = std::io::stdout().lock();
                if args.json {
                    serde_json::to_writer_pretty(&mut out, &report)?;
                    println!();
                } else {
                    synthia_bot::bench::memory::print_human(&report, &mut out)?;
                }
                Ok(())
            }
            Command::Bench(args) => {
                let json = args.json;
                let report =
                    tokio::task::spawn_blocking(move || synthia_bot::bench::run(&args)).await??;
                let mut out = std::io::stdout().lock();
                if json {
                    serde_json::to_writer_pretty(&mut out, &report)?;
                    println!();
                } else {
                    synthia_bot::bench::print_human(&report, &mut out)?;
                }
                Ok(())
            }
            Command::Quantize(args) => {
                let json = args.json;
                let report =
                    tokio::task::spawn_blocking(move || synthia_bot::bench::quantize::run(&args))
                        .await??;
                if json {
                    serde_json::to_writer_pretty(std::io::stdout().lock(), &report)?;
                    println!();
                } else {
                    synthia_bot::bench::quantize::print(&report);
                }
                Ok(())
            }
            Command::BenchRemote(args) => {
                let report = synthia_bot::bench::remote::run(&args).await?;
                if args.json {
                    serde_json::to_writer_pretty(std::io::stdout().lock(), &report)?;
                    println!();
                } else {
                    synthia_bot::bench::remote::print(&report);
                }
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
