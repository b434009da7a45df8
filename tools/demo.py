#!/usr/bin/env python3
"""Try AAM Auto Backup without an AWS account.

Starts a local S3 + SES endpoint (moto's server mode on 127.0.0.1), creates
sample data and an instruction file under ./demo-output, runs a regular backup
(a full one), changes a file, runs it again (an incremental one), prints what
was made (the S3 objects, the local mirror, the e-mails, the logs), and
finally restores everything with the one-step restoration (the local
endpoint thaws Deep Archive objects at once; AWS takes hours).

    tools/demo            # sets up what is needed, then runs this file
    python tools/demo.py [--output DIR]
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import aam_auto_backup as aab  # noqa: E402
from local_aws import LocalAws  # noqa: E402
from sample_tree import build_sample  # noqa: E402

PROGRAM = os.path.join(REPO, "aam_auto_backup.py")
BUCKET = "aam-demo-backup"
LOCATION = "demo-computer"
SENDER = "backup-report@example.com"
RECIPIENT = "you@example.com"
DEMO_KEY_VARIABLE = "AAM_DEMO_ENCRYPTION_KEY"


def write_backup_settings(output, instructions):
    """The daily backup's settings file (the program's named form); its path."""
    path = os.path.join(output, "backup.settings")
    settings = [("lock-poll", "5"), ("lock-wait", "60"),
                ("log-dir", os.path.join(output, "logs")), ("sender-address", SENDER),
                ("recipient", RECIPIENT), ("instruction-file", instructions),
                ("destinations", "local|AWS"), ("mirror-root", os.path.join(output, "mirror")),
                ("key", f"env:{DEMO_KEY_VARIABLE}"), ("bucket", BUCKET),
                ("location", LOCATION)]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("# The demo's backup settings (aam_auto_backup.py regular-backup --help)\n")
        handle.writelines(f"{name} = {value}\n" for name, value in settings)
    return path


def backup_command(settings_file):
    """A regular backup in the named form: the settings file."""
    return [sys.executable, PROGRAM, aab.REGULAR_BACKUP, "--settings", settings_file]


def restore_command(output):
    """The one-step restoration, by named options."""
    return [sys.executable, PROGRAM, aab.ONE_STEP_RESTORE,
            "--log-dir", os.path.join(output, "logs"), "--sender-address", SENDER,
            "--recipient", RECIPIENT, "--days", "2", "--key", f"env:{DEMO_KEY_VARIABLE}",
            "--bucket", BUCKET, "--location", LOCATION,
            "--destination", os.path.join(output, "restored")]


def heading(text):
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run_backup(command, env, title):
    heading(title)
    print("$ " + " ".join(_quote(a) for a in command[1:]), flush=True)
    result = subprocess.run(command, env=env)
    print(f"(exit code {result.returncode})")
    return result.returncode


def _quote(text):
    return f'"{text}"' if (" " in text or "|" in text or not text) else text


def show_objects(aws):
    heading("Objects in s3://" + BUCKET)
    s3 = aws.client("s3")
    for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        print(f"{item.get('StorageClass', 'STANDARD'):<13} {item['Size']:>9,}  {item['Key']}")


def show_tree(title, root):
    heading(title)
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            print(f"{os.path.getsize(path):>9,}  {os.path.relpath(path, root)}")


def show_emails(aws):
    heading("E-mails received by the local SES endpoint")
    for message in aws.sent_emails():
        print(f"From: {message['source']}\nTo: {', '.join(message['destinations'])}\n"
              f"Subject: {message['subject']}\n\n{message['body']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(REPO, "demo-output"),
                        help="where sample data, mirror and logs go (replaced)")
    options = parser.parse_args()
    output = os.path.abspath(options.output)
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(output)

    with LocalAws() as aws:
        aws.create_bucket(BUCKET)
        aws.verify_ses_identity(SENDER)
        tree = build_sample(os.path.join(output, "data", "first"),
                            os.path.join(output, "data", "second"))
        instructions = os.path.join(output, "instructions.txt")
        with open(instructions, "w", encoding="utf-8") as handle:
            handle.write(tree.instruction_text)
        heading(f"Instruction file {instructions}")
        print(tree.instruction_text)
        settings_file = write_backup_settings(output, instructions)
        heading(f"Settings file {settings_file}")
        with open(settings_file, encoding="utf-8") as handle:
            print(handle.read())

        env = aws.env()
        env.update({DEMO_KEY_VARIABLE: "demo key: use a long passphrase of your own",
                    "AAM_TEMP_ROOT": os.path.join(output, "temp"),
                    "AAM_LOCK_FILE": os.path.join(output, "aam_auto_backup.lock")})
        codes = [run_backup(backup_command(settings_file), env,
                            "Run 1: regular backup (the month's full backup)")]
        time.sleep(0.1)
        changed = os.path.join(tree.first_mount, "Documents", "report.txt")
        with open(changed, "a", encoding="utf-8") as handle:
            handle.write("an edit after the full backup\n")
        print(f"\nChanged {changed}")
        codes.append(run_backup(backup_command(settings_file), env,
                                "Run 2: regular backup again (an incremental backup)"))
        show_objects(aws)
        show_tree("Local mirror " + os.path.join(output, "mirror"),
                  os.path.join(output, "mirror"))
        codes.append(run_backup(restore_command(output), env,
                                "Run 3: one-step restoration from Deep Archive"))
        show_tree("Restored into " + os.path.join(output, "restored"),
                  os.path.join(output, "restored"))
        show_emails(aws)
        heading("Logs")
        for name in sorted(os.listdir(os.path.join(output, "logs"))):
            print(os.path.join(output, "logs", name))
    return 0 if codes == [0, 0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
