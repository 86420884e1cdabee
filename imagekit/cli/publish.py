"""``imagekit upload``, ``properties lint|rules`` and ``images list|prune``: publishing to Glance."""

from __future__ import annotations

import click

from imagekit.cli.completion import complete_recipe
from imagekit.cli.output import (
    ProgressBar,
    emit,
    human_bytes,
    json_option,
    out_console,
    print_lint,
    result_type,
    size_option,
)
from imagekit.cli.root import cli

_VISIBILITIES = ["private", "shared", "community", "public"]


@cli.command()
@result_type("imagekit.cli.results:ConvertedUploadOut | imagekit.glance:UploadResult | imagekit.cli.results:LintResult",
             "upload")
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@click.option("--cloud", metavar="NAME", help="Cloud from clouds.yaml (default: OS_CLOUD, then the OS_* variables).")
@click.option("--name", help="Image name (default: the recipe's glance.name, else the file name).")
@click.option("--recipe", metavar="R", shell_complete=complete_recipe,
              help="Recipe whose os/glance sections give properties, tags, name.")
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE", help="Image property (repeatable; "
              "KEY= removes one).")
@click.option("--visibility", type=click.Choice(_VISIBILITIES), help="Default: the recipe's, else private.")
@click.option("--tag", "tags", multiple=True, help="Image tag (repeatable).")
@click.option("--protected/--no-protected", default=None, help="Protect the image once it is verified.")
@click.option("--min-ram", type=click.IntRange(0), help="min_ram in MiB.")
@click.option("--import-method", type=click.Choice(["direct", "glance-direct", "web-download"]), default="direct",
              show_default=True)
@click.option("--url", help="web-download: the URL Glance fetches (IMAGE, if given, is checked and its hash compared).")
@click.option("--disk-format", help="web-download without IMAGE only: the format of the data at --url.")
@click.option("--force-upload", is_flag=True, help="Upload even if an identical active image exists.")
@click.option("--prune-keep", type=click.IntRange(1), help="After the upload, keep the N newest images of the prefix.")
@click.option("--prune-action", type=click.Choice(["hide", "deactivate", "delete"]), default="hide",
              show_default=True)
@click.option("--prune-prefix", help="Name prefix for --prune-keep (default: the recipe name, else the image name).")
@click.option("--max-virtual-size", metavar="SIZE", help="Refuse images with a larger virtual size.")
@click.option("--lint-only", is_flag=True, help="Only build and lint the properties; do not check or upload.")
@click.option("--confined", is_flag=True, help="The recipe comes from an untrusted source: refuse host files outside its folder, DIB environment, unpinned or non-https downloads, public images (docs/trust-model.md).")
@click.option("--convert", "convert_", is_flag=True, help="Convert IMAGE to qcow2 on the way: the bytes go to "
              "Glance as they are written (no local copy), verified by size and hash.")
@click.option("--compress", type=click.Choice(["none", "zlib", "zstd"]), default="none", show_default=True,
              help="With --convert: compress qcow2 clusters (zstd needs QEMU >= 5.1 on the hypervisors).")
@click.option("--cluster-size", metavar="SIZE", help="With --convert: qcow2 cluster size (default 64K).")
@json_option
def upload(image: str | None, cloud: str | None, name: str | None, recipe: str | None, props: tuple[str, ...],
           visibility: str | None, tags: tuple[str, ...], protected: bool | None, min_ram: int | None,
           import_method: str, url: str | None, disk_format: str | None, force_upload: bool,
           prune_keep: int | None, prune_action: str, prune_prefix: str | None, max_virtual_size: str | None,
           lint_only: bool, confined: bool, convert_: bool, compress: str, cluster_size: str | None) -> None:
    """Check IMAGE and publish it to Glance, verified by size, md5 and sha512.

    disk_format comes from the detected format, never the extension. An identical
    active image (same name and sha512) is reused. A failed or interrupted upload
    leaves no usable image behind.
    """
    from imagekit import glance, properties
    from imagekit import recipe as rec
    from imagekit.cloud import connect

    if confined:
        from imagekit import confine
        from imagekit.errors import RecipeError

        refused = confine.check_cli_publish(visibility, properties.parse_assignments(props))
        if refused:
            raise RecipeError(f"{len(refused)} option(s) refused in confined mode", "drop them; see docs/trust-model.md",
                              refused)
    opts = glance.UploadOptions(
        name=name, recipe=rec.load(recipe, confined=confined) if recipe else None,
        properties=properties.parse_assignments(props), visibility=visibility,
        tags=list(tags), protected=protected, min_ram=min_ram, import_method=import_method,  # type: ignore[arg-type]
        url=url, disk_format=disk_format, force_upload=force_upload, prune_keep=prune_keep,
        prune_action=prune_action, prune_prefix=prune_prefix,  # type: ignore[arg-type]
        max_virtual_size=size_option(max_virtual_size))
    if lint_only:
        p = glance.plan(image, opts, lint_only=True)
        data = {"ok": True, "properties": p.properties, "findings": [f.to_dict() for f in p.lint]}

        def human_lint() -> None:
            out_console.print(f"[green]ok[/] {len(p.properties)} properties, no inconsistency", highlight=False)
            for k, v in sorted(p.properties.items()):
                out_console.print(f"  {k} = {v}", markup=False)
            print_lint(data["findings"])  # type: ignore[arg-type]

        emit(data, human_lint)
        return
    if convert_:
        _upload_converted(image, cloud, opts, compress, cluster_size)
        return
    p = glance.plan(image, opts)
    c = connect(cloud)
    with ProgressBar("upload") as bar:
        result = glance.upload(c, image, opts, progress=bar.update, plan_=p)
    data = result.to_dict()

    def human() -> None:
        img = result.image
        pr = out_console.print
        if result.reused:
            pr(f"[green]reused[/] image {img['id']} '{img['name']}' (same name and sha512 already active)",
               highlight=False)
        else:
            pr(f"[green]uploaded[/] {image or result.method} as '{img['name']}' ({img['id']})", highlight=False)
            thr = f", {result.throughput_mib_s} MiB/s" if result.throughput_mib_s else ""
            pr(f"  {result.method}, {result.disk_format}, {human_bytes(result.size)}{thr}, "
               f"{'verified' if result.verified else 'NOT verified (no local file)'}", highlight=False)
        pr(f"  cloud {result.cloud['cloud']} ({result.cloud['endpoint']}), status {img['status']}, "
           f"visibility {img['visibility']}{', protected' if img.get('protected') else ''}", highlight=False)
        pr(f"  sha512 {result.sha512}", highlight=False)
        if result.lint:
            print_lint(result.lint)
        if result.pruned:
            changed = [r for r in result.pruned["images"] if r["action"] in ("hide", "deactivate", "delete")]
            pr(f"  pruned: {len(changed)} image(s) {result.pruned['action']}", highlight=False)

    emit(data, human)


def _upload_converted(image: str | None, cloud: str | None, opts: object, compress: str,
                      cluster_size: str | None) -> None:
    """``upload --convert``: imagekit.glance_stream.upload_converted with a progress bar."""
    from imagekit import convert as conv
    from imagekit.cloud import connect
    from imagekit.errors import UsageError
    from imagekit.glance_stream import upload_converted

    if image is None:
        raise UsageError("--convert needs the IMAGE to convert", "imagekit upload disk.vmdk --convert --cloud NAME")
    copts = conv.ConvertOptions(cluster_size=size_option(cluster_size),
                                compress=None if compress == "none" else compress,
                                max_virtual_size=getattr(opts, "max_virtual_size", None))
    c = connect(cloud)
    with ProgressBar("upload") as bar:
        res = upload_converted(c, image, opts, copts, progress=bar.update)  # type: ignore[arg-type]
    data = res.to_dict()

    def human() -> None:
        r = res.upload
        pr = out_console.print
        pr(f"[green]uploaded[/] {image} ({res.input_format}) converted to qcow2 as '{r.image['name']}' "
           f"({r.image['id']})", highlight=False)
        thr = f", {r.throughput_mib_s} MiB/s" if r.throughput_mib_s else ""
        pr(f"  {human_bytes(res.size)} streamed{thr}, verified: Glance size and hash match, qemu-img map as "
           f"planned ({res.map_ranges} ranges), qemu-img check {res.qemu_check}", highlight=False)
        pr(f"  sha256 {res.sha256}", highlight=False)
        pr(f"  sha512 {r.sha512}", highlight=False)
        if r.lint:
            print_lint(r.lint)

    emit(data, human)


@cli.group()
def properties() -> None:
    """Glance image properties: build them from a recipe and lint them."""


@properties.command("lint")
@result_type("imagekit.cli.results:LintResult", "properties lint")
@click.option("--recipe", metavar="R", shell_complete=complete_recipe,
              help="Recipe whose os/glance sections give the properties.")
@click.option("--property", "props", multiple=True, metavar="KEY=VALUE", help="Extra or overriding property.")
@json_option
def properties_lint(recipe: str | None, props: tuple[str, ...]) -> None:
    """Build the property set (recipe profile < recipe glance.properties < --property) and lint it. Exit 2 on errors."""
    from imagekit import properties as pm
    from imagekit import recipe as rec

    r = rec.load(recipe) if recipe else None
    built = pm.build(r, pm.parse_assignments(props))
    findings = pm.lint(built, r)
    errors = [f for f in findings if f.severity == "error"]
    data = {"ok": not errors, "properties": built, "findings": [f.to_dict() for f in findings]}

    def human() -> None:
        for k, v in sorted(built.items()):
            out_console.print(f"  {k} = {v}", markup=False)
        if findings:
            print_lint(data["findings"])  # type: ignore[arg-type]
        else:
            out_console.print("[green]ok[/] no inconsistency")

    emit(data, human)  # with --json: the properties and findings, next to the error below
    if errors:
        raise pm.PropertyLintError(f"{len(errors)} inconsistent image propert{'ies' if len(errors) != 1 else 'y'}",
                                   "see the findings above; 'imagekit properties rules' explains each code",
                                   [str(f) for f in errors], findings)


@properties.command("rules")
@result_type("imagekit.cli.results:RulesResult", "properties rules")
@json_option
def properties_rules() -> None:
    """List the linter's rules."""
    from imagekit.properties import RULES

    def human() -> None:
        for k, v in RULES.items():
            out_console.print(f"{k}  {v}", markup=False)

    emit({"rules": RULES}, human)


@cli.group()
def images() -> None:
    """List and rotate images in Glance."""


@images.command("list")
@result_type("imagekit.cli.results:ImageList", "images list")
@click.option("--cloud", metavar="NAME", help="Cloud from clouds.yaml (default: OS_CLOUD / OS_* variables).")
@click.option("--name-prefix", metavar="P", help="Only images whose name starts with P.")
@json_option
def images_list(cloud: str | None, name_prefix: str | None) -> None:
    """List images, newest first (hidden ones included)."""
    from imagekit import glance
    from imagekit.cloud import connect

    rows = glance.list_images(connect(cloud, probe=False), name_prefix)

    def human() -> None:
        for r in rows:
            flags = ",".join(f for f, on in (("protected", r.get("protected")), ("hidden", r.get("os_hidden")))
                             if on)
            out_console.print(f"{r['id']}  {str(r['name']):<30} {r['status']:<11} {str(r['disk_format']):<6} "
                              f"{human_bytes(r.get('size')):>10}  {r['created_at']}  {flags}", markup=False)

    emit({"images": rows}, human)


@images.command("prune")
@result_type("imagekit.cli.results:PruneResult", "images prune")
@click.option("--cloud", metavar="NAME", help="Cloud from clouds.yaml (default: OS_CLOUD / OS_* variables).")
@click.option("--name-prefix", metavar="P", required=True, help="Images whose name starts with P.")
@click.option("--keep", type=click.IntRange(0), required=True, help="How many of the newest to keep.")
@click.option("--hide", "action", flag_value="hide", default=True, help="Hide older images (os_hidden; default).")
@click.option("--deactivate", "action", flag_value="deactivate", help="Deactivate older images.")
@click.option("--delete", "action", flag_value="delete", help="Delete older images.")
@click.option("--dry-run", is_flag=True, help="Show what would be done.")
@json_option
def images_prune(cloud: str | None, name_prefix: str, keep: int, action: str, dry_run: bool) -> None:
    """Keep the KEEP newest images of a prefix (by created_at); protected images are never touched."""
    from imagekit import glance
    from imagekit.cloud import connect

    res = glance.prune(connect(cloud, probe=False), name_prefix, keep, action, dry_run)  # type: ignore[arg-type]

    def human() -> None:
        for r in res["images"]:
            out_console.print(f"{r['action']:<10} {r['id']}  {str(r['name']):<30} {r['created_at']}  ({r['reason']})",
                              markup=False)
        verb = "would change" if dry_run else "changed"
        out_console.print(f"{verb} {sum(r['action'] == action for r in res['images'])} image(s)", markup=False)

    emit(res, human)
