/*
 * The tiny test guest of tests/tests/vm_boot.rs: a few hundred
 * instructions, so it runs in well under a second even on a PVM host that
 * emulates guest code at ~1M instructions/s.
 *
 * Built as a static ELF linked at 2 MiB. Without -DPVH it has no PVH note
 * and blkvm enters it in long mode with rsi = boot_params; with -DPVH it
 * carries the Xen PVH note and is entered in 32-bit protected mode at
 * pvh_start with ebx = hvm_start_info. It prints to COM1, then ends the
 * VM one way:
 *   -DPOWEROFF      ACPI S5: SLP_TYP=5 | SLP_EN to the FADT's sleep
 *                   control register (port 0x600)
 *   -DRESET         i8042 CPU reset command (0xfe to port 0x64)
 *   -DECHO          echoes one line read from COM1 (polling LSR), then
 *                   powers off as -DPOWEROFF
 *   -DTRIPLE_FAULT  ud2 with the empty IDT blkvm loads at boot: #UD
 *                   cannot be delivered, nor #GP, nor #DF: shutdown
 *                   (not int3: PVM fails to emulate it)
 * or does not end it:
 *   -DTICK          spins forever, writing a '.' to COM1 every 2^TICK_SHIFT
 *                   loop iterations (default 2^16, a few per second on a
 *                   PVM host), so a test can tell a running VM from a
 *                   paused one (tests/qmp/run.py)
 */
#define COM1 0x3f8
#define SLEEP_CONTROL 0x600
#define S5_SLP_EN ((5 << 2) | (1 << 5))

	.text
	.code64
	.globl _start
_start:
	lea	msg_hello(%rip), %rdi
	call	puts
	/* boot_params.hdr.header == "HdrS" */
	cmpl	$0x53726448, 0x202(%rsi)
	jne	1f
	lea	msg_zero_page(%rip), %rdi
	call	puts
1:
#if defined(ECHO)
9:	mov	$COM1 + 5, %dx
8:	in	%dx, %al		/* LSR: data ready? */
	test	$1, %al
	jz	8b
	mov	$COM1, %dx
	in	%dx, %al		/* RBR */
	out	%al, %dx		/* THR */
	cmp	$'\n', %al
	jne	9b
	mov	$SLEEP_CONTROL, %dx
	mov	$S5_SLP_EN, %al
	out	%al, %dx
#elif defined(POWEROFF)
	mov	$SLEEP_CONTROL, %dx
	mov	$S5_SLP_EN, %al
	out	%al, %dx
#elif defined(RESET)
	mov	$0x64, %dx
	mov	$0xfe, %al
	out	%al, %dx
#elif defined(TRIPLE_FAULT)
	ud2
#elif defined(TICK)
#ifndef TICK_SHIFT
#define TICK_SHIFT 16
#endif
	mov	$COM1, %dx
10:	mov	$(1 << TICK_SHIFT), %ecx
11:	dec	%ecx
	jnz	11b
	mov	$'.', %al
	out	%al, %dx
	jmp	10b
#endif
2:	hlt
	jmp	2b

/* puts(rdi): writes a NUL-terminated string to COM1. */
puts:
	mov	$COM1, %dx
3:	movb	(%rdi), %al
	test	%al, %al
	jz	4f
	out	%al, %dx
	inc	%rdi
	jmp	3b
4:	ret

	.code32
	.globl pvh_start
pvh_start:
	/* hvm_start_info.magic == XEN_HVM_START_MAGIC_VALUE */
	cmpl	$0x336ec578, (%ebx)
	jne	6f
	mov	$msg_pvh, %esi
	mov	$COM1, %dx
5:	lodsb
	test	%al, %al
	jz	6f
	out	%al, %dx
	jmp	5b
6:	mov	$SLEEP_CONTROL, %dx
	mov	$S5_SLP_EN, %al
	out	%al, %dx
7:	hlt
	jmp	7b

	.section .rodata
msg_hello:
	.asciz	"tiny guest: hello from 64-bit mode\n"
msg_zero_page:
	.asciz	"tiny guest: boot_params has HdrS\n"
msg_pvh:
	.asciz	"tiny guest: PVH entry, start_info magic ok\n"

#ifdef PVH
	/* XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit PVH entry point. */
	.section .note.Xen, "a", @note
	.balign	4
	.long	4
	.long	4
	.long	18
	.asciz	"Xen"
	.balign	4
	.long	pvh_start
#endif
