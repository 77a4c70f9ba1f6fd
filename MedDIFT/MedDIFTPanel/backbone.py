"""The features: the backbone chosen from the catalogue and the options it shows, as form rows."""

from __future__ import annotations

import json

import qt

from MedDIFTLib.core.backbones import PANEL_BACKBONES, PanelBackbone, PanelOption, panel_backbone

from .section import Section


class BackboneSection(Section):
    """The backbone combo box and one row per option of the chosen backbone, all from
    ``MedDIFTLib.core.backbones``; the choice and the values live in the parameter node
    (``backbone``, and ``backboneOptions``: JSON, backbone name -> option -> value)."""

    def __init__(self, panel) -> None:
        super().__init__(panel)
        self._shown: str | None = None
        for backbone in PANEL_BACKBONES:
            self.ui.backboneComboBox.addItem(backbone.label, backbone.name)
        self.ui.backboneComboBox.connect("currentIndexChanged(int)", self.onBackboneChosen)

    def current(self) -> PanelBackbone:
        parameterNode = self.panel.parameterNode
        return panel_backbone(parameterNode.backbone if parameterNode is not None else PANEL_BACKBONES[0].name)

    def update(self, parameterNode, running: bool) -> None:
        if parameterNode is None:
            return
        backbone = self.current()
        index = self.ui.backboneComboBox.findData(backbone.name)
        wasBlocked = self.ui.backboneComboBox.blockSignals(True)
        self.ui.backboneComboBox.currentIndex = index
        self.ui.backboneComboBox.blockSignals(wasBlocked)
        if self._shown != backbone.name:
            self._buildRows(backbone)

    def onBackboneChosen(self, index: int) -> None:
        if self.panel.parameterNode is not None and index >= 0:
            self.panel.parameterNode.backbone = self.ui.backboneComboBox.itemData(index)

    def _buildRows(self, backbone: PanelBackbone) -> None:
        layout = self.ui.backboneOptionsWidget.layout()
        while layout.rowCount():
            layout.removeRow(0)
        values = self.panel.logic.backboneOptionValues(self.panel.parameterNode).get(backbone.name, {})
        for option in backbone.options:
            layout.addRow(f"{option.label}:", self._editor(backbone, option, values.get(option.name, option.default)))
        self._shown = backbone.name

    def _editor(self, backbone: PanelBackbone, option: PanelOption, value):
        """A spin box (whole numbers) or a combo box (choices) that writes its value to the parameter node."""
        if option.choices:
            editor = qt.QComboBox()
            for choice in option.choices:
                editor.addItem(choice.capitalize(), choice)
            editor.currentIndex = max(editor.findData(value), 0)
            editor.connect("currentIndexChanged(int)",
                           lambda index: self._store(backbone, option, editor.itemData(index)))
        else:
            editor = qt.QSpinBox()
            editor.setRange(option.minimum, option.maximum)
            editor.value = int(value)
            editor.connect("valueChanged(int)", lambda number: self._store(backbone, option, int(number)))
        editor.toolTip = option.help
        return editor

    def _store(self, backbone: PanelBackbone, option: PanelOption, value) -> None:
        parameterNode = self.panel.parameterNode
        if parameterNode is None:
            return
        values = self.panel.logic.backboneOptionValues(parameterNode)
        values.setdefault(backbone.name, {})[option.name] = option.check(value)
        parameterNode.backboneOptions = json.dumps(values)

    def reset(self) -> None:
        self._shown = None
