# An image with the driftwatch agent and its signed baseline, registered with the collector.
# A template to adapt, not a turnkey build: the source below builds a qcow2 from a Debian cloud
# image with QEMU; any other builder (amazon-ebs, azure-arm, ...) works the same way, since
# everything driftwatch needs happens in the provisioners. See docs/image-pipeline.md.
#
#   export PKR_VAR_signing_key=/secrets/pipeline.key   # from the CI's secret store
#   export DRIFTWATCH_TOKEN=dwa_...                     # admin API token, ditto
#   packer init . && packer build -var image_version=2026.11.26-1 .
#
# The private signing key is uploaded to /run (a tmpfs) and deleted by provision.sh; the image
# keeps only the public key. The API token never enters the VM: push-baseline.sh runs on the
# build host.

packer {
  required_plugins {
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = ">= 1.1.0"
    }
  }
}

variable "image_id" {
  type    = string
  default = "web"
}

variable "image_version" {
  type        = string
  description = "Unique per build of the image; the collector refuses one not newer than the registered version."
}

variable "base_image_url" {
  type        = string
  description = "The Debian cloud image (qcow2) to start from."
}

variable "base_image_checksum" {
  type = string
}

variable "ssh_private_key_file" {
  type        = string
  description = "A throwaway SSH key pair for the build (KEY and KEY.pub)."
}

variable "agent_package" {
  type        = string
  description = "The driftwatch-agent .deb to install (packaging/build.sh), or \"\" for the repository's."
  default     = ""
}

variable "signing_key" {
  type        = string
  description = "Path of the pipeline's Ed25519 private key (driftwatch-agent keygen) on the build host."
  sensitive   = true
}

variable "public_key" {
  type    = string
  default = "pipeline.pub"
}

variable "collector_grpc" {
  type        = string
  description = "The collector's gRPC URL, written into the agent's drop-in."
}

variable "collector_api" {
  type        = string
  description = "The collector's HTTP API, for registering the baseline from the build host."
}

variable "collector_ca" {
  type        = string
  description = "CA certificate (PEM) of the collector's HTTPS API, on the build host."
  default     = ""
}

locals {
  build_dir     = "/run/driftwatch-build"
  baseline_file = "output/${var.image_id}-${var.image_version}.dwb"
  uploads = compact([
    var.signing_key,
    var.public_key,
    var.agent_package,
    fileexists("policy.toml") ? "policy.toml" : "",
  ])
}

source "qemu" "debian" {
  iso_url          = var.base_image_url
  iso_checksum     = var.base_image_checksum
  disk_image       = true
  format           = "qcow2"
  output_directory = "output/${var.image_id}-${var.image_version}"
  vm_name          = "${var.image_id}-${var.image_version}.qcow2"
  headless         = true
  ssh_username         = "debian"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "10m"
  # The cloud image takes its SSH key from cloud-init's NoCloud seed (a CD labelled cidata;
  # Packer needs xorriso or mkisofs to make it).
  cd_label = "cidata"
  cd_content = {
    "meta-data" = ""
    "user-data" = <<-EOF
      #cloud-config
      ssh_authorized_keys:
        - ${trimspace(file("${var.ssh_private_key_file}.pub"))}
    EOF
  }
  shutdown_command = "sudo systemctl poweroff"
}

build {
  sources = ["source.qemu.debian"]

  # ... the image's own provisioners (the workload) go here: driftwatch comes last, so the
  # baseline records the finished image.

  provisioner "shell" {
    inline = ["sudo install -d -m 0700 -o \"$(id -un)\" ${local.build_dir}"]
  }

  provisioner "file" {
    sources     = local.uploads
    destination = "${local.build_dir}/"
  }

  provisioner "shell" {
    script          = "provision.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "DRIFTWATCH_IMAGE_ID=${var.image_id}",
      "DRIFTWATCH_IMAGE_VERSION=${var.image_version}",
      "DRIFTWATCH_COLLECTOR=${var.collector_grpc}",
      "DRIFTWATCH_BUILD_DIR=${local.build_dir}",
      "DRIFTWATCH_AGENT_PACKAGE=${var.agent_package == "" ? "" : "${local.build_dir}/${basename(var.agent_package)}"}",
    ]
  }

  # Per-host identity must not be baked in: cloud-init and systemd make it at first boot.
  provisioner "shell" {
    inline = [
      "sudo rm -rf ${local.build_dir}",
      "sudo truncate -s 0 /etc/machine-id",
    ]
  }

  provisioner "file" {
    direction   = "download"
    source      = "/etc/driftwatch/baseline.dwb"
    destination = local.baseline_file
  }

  # On the build host: DRIFTWATCH_TOKEN comes from the environment Packer runs in.
  provisioner "shell-local" {
    environment_vars = compact([
      "DRIFTWATCH_API=${var.collector_api}",
      var.collector_ca == "" ? "" : "DRIFTWATCH_CA_FILE=${var.collector_ca}",
    ])
    inline = ["sh push-baseline.sh ${local.baseline_file}"]
  }
}
